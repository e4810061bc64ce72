"""Exports for stock pipelines: `pipeline` writes diffusers / kohya / full exports and loads them back;
`scheduler` builds the stock scheduler that reproduces the student's steps."""
