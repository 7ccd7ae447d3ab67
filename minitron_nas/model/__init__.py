"""The model: architectures and their exact parameter counts, model families, teachers, devices, saving."""
