"""What a run stands on: processes and sharding (`distributed`), checkpoints on disk
(`checkpoint`), one writer per folder (`locks`), where numbers and pictures go (`tracking`) and
labelled sample grids (`grids`)."""
