package harness

import (
	"errors"
	"fmt"
)

// State is where an instance (execution environment) is in its life.
//
//	              Init ok
//	starting ─────────────> busy ⇄ idle
//	   │                     │      │
//	   └─────────────────> stopping <┘ ───> gone
//
// A starting instance also goes straight to idle when the client that
// caused it left during INIT. Stopping is entered on start or INIT
// failure, Reset, timeout, exit, retirement, keep-alive expiry, eviction
// and harness shutdown; gone once Driver.Stop returned.
//
// Every transition not drawn above is refused with errIllegalTransition
// (RIE's disallow-by-default pattern), so a bug that would, say, hand a
// stopping instance to an invocation fails loudly instead of running on a
// half-destroyed sandbox.
type State uint8

const (
	// StateStarting: Driver.Start or INIT is running.
	StateStarting State = iota + 1
	// StateIdle: initialised and waiting for an invocation (frozen, in Lambda terms).
	StateIdle
	// StateBusy: running exactly one invocation.
	StateBusy
	// StateStopping: removed from the pool; Driver.Stop is running.
	StateStopping
	// StateGone: nothing of the instance remains on the host.
	StateGone
)

func (s State) String() string {
	switch s {
	case StateStarting:
		return "starting"
	case StateIdle:
		return "idle"
	case StateBusy:
		return "busy"
	case StateStopping:
		return "stopping"
	case StateGone:
		return "gone"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// errIllegalTransition is returned for a transition the diagram does not allow.
var errIllegalTransition = errors.New("illegal instance state transition")

// allowed lists, per state, the states it may move to. Anything absent is
// refused.
var allowed = map[State][]State{
	StateStarting: {StateIdle, StateBusy, StateStopping},
	StateIdle:     {StateBusy, StateStopping},
	StateBusy:     {StateIdle, StateStopping},
	StateStopping: {StateGone},
}

// canMove reports whether from -> to is a legal transition.
func canMove(from, to State) bool {
	for _, s := range allowed[from] {
		if s == to {
			return true
		}
	}
	return false
}

// transition checks from -> to and returns an errIllegalTransition naming
// both states when it is not allowed.
func transition(from, to State) error {
	if !canMove(from, to) {
		return fmt.Errorf("instance %s -> %s: %w", from, to, errIllegalTransition)
	}
	return nil
}
