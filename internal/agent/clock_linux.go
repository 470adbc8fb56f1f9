package agent

import (
	"time"

	"golang.org/x/sys/unix"
)

// clockSlack is how far the clock may be off the harness's before
// syncClock sets it: about what one frame's transit takes.
const clockSlack = time.Millisecond

// setClock is syncClock; tests replace it (they must never set the host's
// clock).
var setClock = syncClock

// syncClock sets the system clock to hostNano if it is further off than
// clockSlack. See Options.OwnsKernel.
func syncClock(hostNano int64) error {
	if d := time.Now().UnixNano() - hostNano; d > -int64(clockSlack) && d < int64(clockSlack) {
		return nil
	}
	tv := unix.NsecToTimeval(hostNano)
	return unix.Settimeofday(&tv)
}
