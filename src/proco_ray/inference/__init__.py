"""Using a trained model: batch prediction on Ray Data and the self-contained exported model."""
