"""The lean edge runtime (never imports torch), in rooms along a frame's path:

- ``capture``: where frames come from (cameras, streams, videos, image folders) and the grabber threads that
  queue them;
- ``inference``: the bundle, the resize to the model's input, the backends (TensorRT, ONNX Runtime, OpenVINO)
  and CUDA buffers, the verdict and its regions;
- ``frame_loop``: takes the frames of every source, runs them through inference and hands one record per frame
  to the outputs;
- ``outputs``: the sinks a record goes to (the JSON log, overlays, MQTT, the operator's page, health alarms,
  frames collected for recalibration, the console) and the run's output folder;
- ``commands``: inspect-run and inspect-bench.

Beside them: ``console`` (one-line errors, warnings, progress), ``files`` (atomic writes) and ``datasets``
(labelled data sets, for training, calibration and evaluation)."""
