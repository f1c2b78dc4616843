"""The datasets: which IDX files, classes and normalisation each has, reading them, the splits and their lineage."""
