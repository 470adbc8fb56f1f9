// Command static is a tiny program the tests build with CGO_ENABLED=0 to
// stand in for the static agent binary.
package main

import "os"

func main() { os.Stdout.WriteString("static\n") }
