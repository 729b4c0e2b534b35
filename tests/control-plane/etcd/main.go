// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 for
// the integration-test control plane (see ../README.md and ../build.sh).
// It lives in its own module so etcd's dependency versions never move those
// of the Kubernetes wrapper module in ../kubernetes.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
