package agent

import (
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// TestSyncClock checks that only an agent told to own the clock sets it,
// from the harness's time in Init.
func TestSyncClock(t *testing.T) {
	var mu sync.Mutex
	var set []int64
	old := setClock
	setClock = func(ns int64) error {
		mu.Lock()
		defer mu.Unlock()
		set = append(set, ns)
		return nil
	}
	t.Cleanup(func() { setClock = old })

	host := time.Now().Add(-3 * time.Second).UnixNano()
	for _, own := range []bool{false, true} {
		ta := startAgentWith(t, Options{OwnsKernel: own})
		cfg := fakeInit(t, "ok")
		cfg.HostUnixNano = host
		if done, _ := ta.init(cfg); done.Error != nil {
			t.Fatalf("init: %+v", done.Error)
		}
		mu.Lock()
		got := append([]int64(nil), set...)
		mu.Unlock()
		if !own && len(got) != 0 {
			t.Fatalf("an agent without OwnsKernel set the clock to %v", got)
		}
		if own && (len(got) != 1 || got[0] != host) {
			t.Fatalf("an agent with OwnsKernel set the clock to %v, want [%d]", got, host)
		}
		// Every Invoke carries the host's clock too.
		id := ta.nextID()
		ta.send(protocol.TypeInvoke, protocol.Invoke{RequestID: id, HostUnixNano: host + 7}, []byte(`{}`))
		if r := ta.readResult(); r.FunctionError != "" {
			t.Fatalf("invoke: %+v %s", r.Result, r.payload)
		}
		mu.Lock()
		got = append([]int64(nil), set...)
		mu.Unlock()
		if !own && len(got) != 0 {
			t.Fatalf("an agent without OwnsKernel set the clock to %v", got)
		}
		if own && (len(got) != 2 || got[1] != host+7) {
			t.Fatalf("after an Invoke the clock was set to %v, want [%d %d]", got, host, host+7)
		}
	}
	// Within the slack nothing is set (the real function, safely: no call).
	if err := syncClock(time.Now().UnixNano()); err != nil {
		t.Fatalf("syncClock within the slack: %v", err)
	}
}
