"""vlsi apps: the local server and demo page (installed as ``vlsi_apps``)."""
