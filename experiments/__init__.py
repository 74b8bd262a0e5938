"""Studies: the paper's tables declared as data (tables.py), run cell by cell and seed by seed
as ordinary train.py + evaluate_fid.py runs (run.py), and aggregated over seeds (aggregate.py)."""
