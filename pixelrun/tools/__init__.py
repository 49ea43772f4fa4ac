"""Programs around training: step timings (`bench`), a whole run's wall time forecast from
them (`forecast`), and the diffusers export (`export_diffusers`)."""
