"""The client side: preference memory, local training, ONNX runtime, Flower ClientApp."""
