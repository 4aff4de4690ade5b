"""fedmosaic: federated learning that moves the model, not the data."""
