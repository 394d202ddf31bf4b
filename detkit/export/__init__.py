"""ONNX export, its onnxruntime check and the ONNX runtime detector (``detkit export``); fills no registry."""
