"""Where frames come from: sources (cameras, streams, videos, image folders) and one grabber thread each."""
