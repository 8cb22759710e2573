"""The commands of the edge box: inspect-run and inspect-bench."""
