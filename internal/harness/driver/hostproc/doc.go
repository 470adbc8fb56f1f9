// Package hostproc is what the sandbox drivers whose instances are host
// processes share: the process driver's sandbox init, the VM driver's
// QEMU. Each driver keeps what is its own (namespaces, cgroups, disks,
// QMP); this package has the parts that are the same for any child the
// harness must never lose track of:
//
//   - Table is a driver's instances by ID; its Close stops them all and
//     guarantees that no Start follows.
//   - Forker starts children from one OS thread that lives as long as the
//     driver, so their Pdeathsig fires when the harness dies and never
//     earlier.
//   - Supervise is a child's only cmd.Wait; Stop ends a child in order
//     (a request to exit, a grace period, SIGKILL).
//   - Proc names a process by pid and start time, so a recycled pid is
//     never mistaken for it, and Kill ends one a crashed harness left.
//   - WriteRecord and ReadRecord keep the per-instance record Recover
//     reads after a crash.
//   - LineLog logs a child's output line by line under a byte budget and
//     keeps its last lines for error messages.
//   - DialUnix and SocketAddr reach a child's unix sockets however deep
//     the directory they are in (sun_path holds 107 bytes).
//
// Everything here is Linux-only (it reads /proc and uses pidfds).
package hostproc
