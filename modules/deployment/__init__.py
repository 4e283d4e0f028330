"""Deployment: ONNX export (torch, scikit-learn), ONNX Runtime int8, the parity gate, reports."""
