"""What `lesion run` does for each kind of spec beyond the Python API: writing results and reports."""
