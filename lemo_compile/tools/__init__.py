"""Tools on top of the backend: `explain` (and LEMO_DEBUG_DIR's dumps), ONNX export, the demo and
the `lemo` command line. Nothing in the compiler imports this package."""
