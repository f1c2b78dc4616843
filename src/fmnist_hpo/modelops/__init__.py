"""What is done with trained models: evaluate, predict, register, and verify the record against them."""
