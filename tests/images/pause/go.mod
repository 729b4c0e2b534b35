module notebook-operator/tests/images/pause

go 1.22
