"""interop: cellwatch's results and model in the tools labs already run (napari, bioimage.io)."""
