package agent

import (
	"fmt"

	"github.com/invokex/invokex/internal/errdefs"
)

// state is the lifecycle state of the execution environment the agent runs.
//
//	        Init / lazy INIT            first /next
//	Idle ───────────────> Initializing ─────────────> Ready <──────────┐
//	 ^                        │                        │  │            │
//	 │                        │ init error, exit,      │  │ Invoke     │ /response, /error
//	 │                        │ INIT timeout           │  v            │
//	 │                        v          runtime exit  │  Invoking ────┘
//	 └──────────────────── Resetting <─────────────────┘     │
//	        runtime reaped     ^                             │
//	                           └─────────────────────────────┘
//	                             timeout, crash, oversize response
//
// Every state may also move to Closed when Run returns. Any other move is
// refused with errNotAllowed, the way RIE's states refuse every transition
// they do not explicitly allow: a /response while no invocation is current or
// a second Invoke while one runs never silently changes anything.
type state uint8

const (
	// stateIdle: no runtime process exists (never started, or reset).
	stateIdle state = iota
	// stateInitializing: the runtime was started and INIT runs until its
	// first GET /next (success) or an init error, exit or INIT timeout.
	stateInitializing
	// stateReady: the runtime is initialised and no invocation is current;
	// it is (or soon will be) blocked in GET /next.
	stateReady
	// stateInvoking: exactly one invocation is current.
	stateInvoking
	// stateResetting: the runtime is being killed (or has died) and is being
	// reaped; INIT must run again before the next invocation.
	stateResetting
	// stateClosed: Run is returning; nothing is allowed any more.
	stateClosed
)

func (s state) String() string {
	switch s {
	case stateIdle:
		return "idle"
	case stateInitializing:
		return "initializing"
	case stateReady:
		return "ready"
	case stateInvoking:
		return "invoking"
	case stateResetting:
		return "resetting"
	case stateClosed:
		return "closed"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// errNotAllowed is returned for a transition the current state does not
// allow. It is an errdefs.ErrConflict: the environment is in a state that
// forbids the operation now.
var errNotAllowed = fmt.Errorf("state transition not allowed: %w", errdefs.ErrConflict)

// allowed lists, for each state, the states it may move to. Closed is
// reachable from everywhere and handled separately.
var allowed = [...][]state{
	stateIdle:         {stateInitializing},
	stateInitializing: {stateReady, stateResetting},
	stateReady:        {stateInvoking, stateResetting},
	stateInvoking:     {stateReady, stateResetting},
	stateResetting:    {stateIdle},
	stateClosed:       nil,
}

// machine holds the current state. It is not safe for concurrent use: the
// environment guards it with its mutex, so that checking a state and acting
// on it is one atomic step.
type machine struct {
	cur state
}

// can reports whether moving from the current state to next is allowed.
func (m *machine) can(next state) bool {
	if next == stateClosed {
		return m.cur != stateClosed
	}
	for _, s := range allowed[m.cur] {
		if s == next {
			return true
		}
	}
	return false
}

// to moves to next, or returns an error wrapping errNotAllowed and leaves the
// state unchanged.
func (m *machine) to(next state) error {
	if !m.can(next) {
		return fmt.Errorf("%s to %s: %w", m.cur, next, errNotAllowed)
	}
	m.cur = next
	return nil
}

// is reports whether the current state is s.
func (m *machine) is(s state) bool { return m.cur == s }
