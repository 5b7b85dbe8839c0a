"""RunInference ModelHandlers and the model file registry."""
