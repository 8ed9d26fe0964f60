"""lm-eval task definitions (YAML) and their Python builders; a package so an install ships the builders."""
