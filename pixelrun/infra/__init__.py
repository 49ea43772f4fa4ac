"""What a run stands on: processes and sharding (`distributed`), the device's name and peak
FLOP/s (`devices`), checkpoints on disk (`checkpoint`), one writer per folder (`locks`), where
numbers and pictures go (`tracking`) and labelled sample grids (`grids`)."""
