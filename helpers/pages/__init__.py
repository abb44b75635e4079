"""The book layer: figures, tables and glue for the chapters, and the verdict page. It reads the experiments'
results; it computes nothing from a model."""
