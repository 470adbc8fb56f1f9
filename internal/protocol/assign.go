package protocol

import (
	"encoding/json"
	"fmt"
	"io"
)

// Assignment is what the host sends the init of a spare microVM: a VM
// booted ahead of need, without a function (its kernel command line says
// invokex.spare=1). The init writes its spare line, reads one Assignment
// (WriteAssignment, ReadAssignment), makes the VM the instance's (hostname,
// code disk) and only then writes its ready line and starts the agent, so
// the protocol's frames follow as on any VM. The host swaps the code disk
// behind the guest before it sends the Assignment.
//
// A spare restored from a template (a snapshot of a spare that had just
// booted, see package qemu) is first sent an Assignment with Renew set and
// no Hostname: the init renews its kernel as after any restore, warms up
// if asked, writes its spare line again and reads the next Assignment.
type Assignment struct {
	// Hostname is the instance's hostname; empty only with Renew.
	Hostname string `json:"hostname,omitempty"`
	// Renew, if set, is not an assignment but a renewal.
	Renew *Renewal `json:"renew,omitempty"`
}

// Renewal makes a spare restored from a template a VM of its own: every
// restore of the template starts from the same memory.
type Renewal struct {
	// Restore carries the host's clock and fresh randomness for the
	// kernel (its Hostname is not used: the assignment sets it).
	Restore Restore `json:"restore"`
	// WarmUp asks the init to run the agent once, in the spare, with a
	// runtime of its own before it writes its spare line: under software
	// emulation (QEMU's TCG) a restored VM has no translated code, and
	// the kernel's and the agent's paths a cold start takes are then
	// translated ahead of need instead of during the cold start.
	WarmUp bool `json:"warmUp,omitempty"`
}

// MinRenewalSeed is the least randomness a Renewal carries.
const MinRenewalSeed = 16

// maxAssignment bounds an Assignment line.
const maxAssignment = 4096

// WriteAssignment writes a as one JSON line.
func WriteAssignment(w io.Writer, a Assignment) error {
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// ReadAssignment reads one Assignment line from r a byte at a time, so that
// no byte after it is consumed, and checks it.
func ReadAssignment(r io.Reader) (Assignment, error) {
	var a Assignment
	line := make([]byte, 0, 128)
	var b [1]byte
	for {
		n, err := r.Read(b[:])
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			if len(line) == maxAssignment {
				return a, fmt.Errorf("assignment longer than %d bytes", maxAssignment)
			}
			line = append(line, b[0])
			continue
		}
		if err != nil {
			return a, fmt.Errorf("reading the assignment: %w", err)
		}
	}
	if err := json.Unmarshal(line, &a); err != nil {
		return a, fmt.Errorf("decoding the assignment: %w", err)
	}
	if a.Renew != nil {
		if a.Hostname != "" || a.Renew.Restore.Hostname != "" {
			return a, fmt.Errorf("assignment: a renewal has no hostname")
		}
		// Without fresh randomness every restore of a template would
		// share the kernel generator's state.
		if len(a.Renew.Restore.Seed) < MinRenewalSeed {
			return a, fmt.Errorf("assignment: a renewal needs a seed of at least %d bytes, got %d", MinRenewalSeed, len(a.Renew.Restore.Seed))
		}
		return a, nil
	}
	if a.Hostname == "" || len(a.Hostname) > 64 {
		return a, fmt.Errorf("assignment: hostname %q must be 1 to 64 bytes", a.Hostname)
	}
	return a, nil
}
