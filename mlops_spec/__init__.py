"""The stack's spec, a package of its own: what a stage declares (`models`), the rules that follow from its
kind (`rules`), loading with file:line errors (`loading`, `yamlsource`, `errors`), which project is worked on
(`project`), the provider's number encodings (`encoding`) and the names every side agrees on (`contract`).

It imports neither Pulumi nor Docker: the components (`components/`), the commands (`mlops/`) and the tests
all build on it, and it builds on none of them."""
