package controlplane

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
)

// putLog is a store.Invocations that remembers every record Put, in order.
type putLog struct {
	store.Invocations
	mu   sync.Mutex
	puts []invocation.Record
}

func (p *putLog) Put(ctx context.Context, recs []*invocation.Record) error {
	p.mu.Lock()
	for _, r := range recs {
		p.puts = append(p.puts, *r)
	}
	p.mu.Unlock()
	return p.Invocations.Put(ctx, recs)
}

// statuses returns the statuses Put for id, in order.
func (p *putLog) statuses(id string) []invocation.Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []invocation.Status
	for _, r := range p.puts {
		if r.RequestID == id {
			out = append(out, r.Status)
		}
	}
	return out
}

func newTestWriter(t *testing.T, delay time.Duration) (*recordWriter, *putLog) {
	st, _ := newBackends(t)
	log := &putLog{Invocations: st.Invocations()}
	w := newRecordWriter(log, slog.New(slog.NewTextHandler(io.Discard, nil)))
	w.delay = delay
	w.start()
	return w, log
}

func rec(id string, status invocation.Status) *invocation.Record {
	return &invocation.Record{RequestID: id, Function: "f", Type: invocation.TypeEvent, Status: status, Start: time.Now()}
}

// A delayed record that a newer one replaces is never written; one that
// nothing replaces is written when due, or at the latest when the writer
// stops; lookups see both all along.
func TestDelayedRecords(t *testing.T) {
	w, log := newTestWriter(t, time.Millisecond)
	w.writeLater(rec("due", invocation.StatusQueued))
	if r := w.lookup("due"); r == nil || r.Status != invocation.StatusQueued {
		t.Fatalf("lookup of a delayed record = %+v", r)
	}
	waitFor(t, "the due record written", func() bool { return len(log.statuses("due")) == 1 })
	w.stop()

	w, log = newTestWriter(t, time.Hour)
	w.writeLater(rec("replaced", invocation.StatusQueued))
	w.writeLater(rec("kept", invocation.StatusQueued))
	for _, id := range []string{"replaced", "kept"} {
		if r := w.lookup(id); r == nil || r.Status != invocation.StatusQueued {
			t.Fatalf("lookup of delayed record %s = %+v", id, r)
		}
	}
	w.write(rec("replaced", invocation.StatusSucceeded))
	waitFor(t, "the replacing record written", func() bool { return len(log.statuses("replaced")) == 1 })
	if got := log.statuses("kept"); len(got) != 0 {
		t.Fatalf("a record delayed by an hour was written already: %v", got)
	}
	if r := w.lookup("kept"); r == nil {
		t.Fatal("a delayed record is not visible before it is written")
	}

	w.stop()
	if got := log.statuses("replaced"); len(got) != 1 || got[0] != invocation.StatusSucceeded {
		t.Fatalf("records written for a replaced delayed record: %v, want only Succeeded", got)
	}
	if got := log.statuses("kept"); len(got) != 1 || got[0] != invocation.StatusQueued {
		t.Fatalf("records written at stop for a delayed record nothing replaced: %v, want Queued", got)
	}
	r, err := log.Get(context.Background(), "kept")
	if err != nil || r.Status != invocation.StatusQueued {
		t.Fatalf("stored record = %+v, %v", r, err)
	}
}

// An Event that runs before its Queued record is due costs one record
// write, and GetInvocation reports it Queued, then final.
func TestEventRunCostsOneRecordWrite(t *testing.T) {
	var log *putLog
	gate := make(chan struct{})
	e := newEnv(t, func(c *Config) {
		log = &putLog{Invocations: c.Store.Invocations()}
		c.Store = recordingStore{Store: c.Store, inv: log}
	})
	e.create("f")
	orig := e.host.script
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		if req.RequestID == "ev" {
			<-gate
		}
		if orig != nil {
			return orig(ctx, req, n)
		}
		return okResult(req, req.Payload), nil
	}
	ctx := context.Background()
	if err := e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	if r, err := e.svc.GetInvocation(ctx, "ev"); err != nil || r.Status != invocation.StatusQueued {
		t.Fatalf("record of a queued event = %+v, %v", r, err)
	}
	// A record written after the Queued one is stored: a Queued record
	// written at once would be too.
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: "marker", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a later record stored", func() bool { return len(log.statuses("marker")) == 1 })
	close(gate)
	if r := e.waitRecord("ev"); r.Status != invocation.StatusSucceeded {
		t.Fatalf("final record = %+v", r)
	}
	closeCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := e.svc.Close(closeCtx); err != nil {
		t.Fatal(err)
	}
	if got := log.statuses("ev"); len(got) != 1 || got[0] != invocation.StatusSucceeded {
		t.Fatalf("records written for an event that ran at once: %v, want only Succeeded", got)
	}
}

// recordingStore routes invocation records through inv.
type recordingStore struct {
	store.Store
	inv store.Invocations
}

func (s recordingStore) Invocations() store.Invocations { return s.inv }
