// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3.
//
// etcd's own main package lives in the root module go.etcd.io/etcd/v3, whose
// go.mod relies on replace directives that Go ignores in a dependency; the
// server module is self-contained, so this wrapper calls its entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
