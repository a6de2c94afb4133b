"""The griffin-export command line (installed as `griffin_export_cli`). No logic lives here:
each command parses options and calls the griffin_export API."""
