"""Where each frame's record goes: the sinks (log, overlays, MQTT, operator page, health, collection, console)."""
