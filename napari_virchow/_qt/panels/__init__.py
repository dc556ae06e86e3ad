"""One module per group box of the dock widget; each builds its controls and handles its events."""
