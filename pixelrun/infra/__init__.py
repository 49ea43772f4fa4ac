"""What a run stands on: processes and sharding (`distributed`), numeric precision on a device
(`precision`), the device's name and peak FLOP/s (`devices`), checkpoints on disk (`checkpoint`)
and a checkpoint opened for inference (`inference`), files written whole (`files`), one writer per
folder (`locks`), where numbers and pictures go (`tracking`) and labelled sample grids (`grids`)."""
