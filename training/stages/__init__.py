"""The training stages: each is a config dataclass, a data source and a loss for the
shared loop in `training.loop`."""
