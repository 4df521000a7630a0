"""The shared core of sol: one model definition, one tokenizer, one chat template and one
checkpoint format, used alike by the server, the training stages and the tests."""
