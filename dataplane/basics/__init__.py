"""Shared basics of every Ferryman process: settings, HOST:PORT parsing, logs, metrics, the version,
node certificates and private state files. Imports nothing else of Ferryman."""
