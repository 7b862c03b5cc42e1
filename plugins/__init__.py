"""Built-in plugins: one module each, holding its Config, PRIORITY, build() and filter."""
