"""What a run stands on: processes and sharding (`distributed`), numeric precision on a device
(`precision`), checkpoints on disk (`checkpoint`) and a checkpoint opened for inference
(`inference`), files written whole (`files`), one writer per folder (`locks`), where numbers and
pictures go (`tracking`) and labelled sample grids (`grids`)."""
