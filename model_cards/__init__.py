"""Model-card templates for pushed Delta-CoMe adapters (package data)."""
