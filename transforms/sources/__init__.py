"""The job's inputs: listed into Sources, unpacked from archives and frame folders, downloaded into the work dir."""
