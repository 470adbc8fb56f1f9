package agent

import (
	"errors"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
)

func TestStateMachineTransitions(t *testing.T) {
	all := []state{stateIdle, stateInitializing, stateReady, stateInvoking, stateResetting, stateClosed}
	legal := map[[2]state]bool{
		{stateIdle, stateInitializing}:      true,
		{stateInitializing, stateReady}:     true,
		{stateInitializing, stateResetting}: true,
		{stateReady, stateInvoking}:         true,
		{stateReady, stateResetting}:        true,
		{stateInvoking, stateReady}:         true,
		{stateInvoking, stateResetting}:     true,
		{stateResetting, stateIdle}:         true,
	}
	for _, from := range all {
		for _, to := range all {
			m := machine{cur: from}
			err := m.to(to)
			want := legal[[2]state{from, to}] || (to == stateClosed && from != stateClosed)
			switch {
			case want && err != nil:
				t.Errorf("%s -> %s refused: %v", from, to, err)
			case want && m.cur != to:
				t.Errorf("%s -> %s left state %s", from, to, m.cur)
			case !want && err == nil:
				t.Errorf("%s -> %s allowed", from, to)
			case !want && (!errors.Is(err, errNotAllowed) || !errors.Is(err, errdefs.ErrConflict) || m.cur != from):
				t.Errorf("%s -> %s: err %v, state %s", from, to, err, m.cur)
			}
		}
	}
}
