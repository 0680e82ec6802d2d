"""The Lightning pieces of a run: the LightningModule, the DataModule and its data order, the
Trainer factory and its callbacks, the validation ground truth."""
