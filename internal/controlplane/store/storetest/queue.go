package storetest

import (
	"bytes"
	"context"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
)

var queueTests = []test{
	{"EnqueueClaimRoundTrip", testQueueRoundTrip},
	{"EnqueueEmpty", testQueueEnqueueEmpty},
	{"EnqueueDuplicate", testQueueDuplicate},
	{"ClaimRespectsNotBefore", testQueueNotBefore},
	{"ClaimRespectsLease", testQueueLease},
	{"ReleaseLeases", testQueueReleaseLeases},
	{"ClaimMax", testQueueMax},
	{"ClaimOrder", testQueueOrder},
	{"Complete", testQueueComplete},
	{"Retry", testQueueRetry},
	{"RetryMissing", testQueueRetryMissing},
	{"ConcurrentClaimers", testQueueConcurrentClaimers},
	{"Copies", testQueueCopies},
	{"CancelledContext", testQueueCancelled},
}

const lease = 30 * time.Second

func event(id string, enqueued time.Time) *store.Event {
	return &store.Event{
		RequestID:     id,
		Function:      "fn",
		Payload:       []byte(`{"id":"` + id + `","bin":"` + "\x00\xff" + `"}`),
		ClientContext: "eyJjdXN0b20iOnt9fQ==",
		EnqueuedAt:    enqueued,
	}
}

func enqueue(t *testing.T, s store.Store, evs ...*store.Event) {
	t.Helper()
	must(t, s.Queue().Enqueue(ctx(t), evs), "Enqueue")
}

func claim(t *testing.T, s store.Store, now time.Time, max int) []*store.Event {
	t.Helper()
	evs, err := s.Queue().Claim(ctx(t), now, lease, max)
	must(t, err, "Claim")
	if len(evs) > max {
		t.Fatalf("Claim(max=%d) returned %d events", max, len(evs))
	}
	return evs
}

func ids(evs []*store.Event) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.RequestID)
	}
	return out
}

func wantLen(t *testing.T, s store.Store, want int) {
	t.Helper()
	n, err := s.Queue().Len(ctx(t))
	must(t, err, "Len")
	if n != want {
		t.Fatalf("Len = %d, want %d", n, want)
	}
}

// checkEvent compares every field; Attempts is compared with wantAttempts.
func checkEvent(t *testing.T, got, want *store.Event, wantAttempts int) {
	t.Helper()
	g, w := *got, *want
	sameTime(t, g.EnqueuedAt, w.EnqueuedAt, "EnqueuedAt")
	sameTime(t, g.NotBefore, w.NotBefore, "NotBefore")
	if !bytes.Equal(g.Payload, w.Payload) {
		t.Errorf("Payload: got %q, want %q", g.Payload, w.Payload)
	}
	if g.Attempts != wantAttempts {
		t.Errorf("Attempts: got %d, want %d", g.Attempts, wantAttempts)
	}
	g.EnqueuedAt, w.EnqueuedAt, g.NotBefore, w.NotBefore = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	g.Payload, w.Payload = nil, nil
	g.Attempts, w.Attempts = 0, 0
	if !reflect.DeepEqual(g, w) {
		t.Errorf("event:\n got %+v\nwant %+v", g, w)
	}
}

func testQueueRoundTrip(t *testing.T, s store.Store) {
	wantLen(t, s, 0)
	a := event("req-a", base)
	b := event("req-b", base.Add(time.Nanosecond))
	b.NotBefore = base.Add(-time.Minute)
	b.Attempts, b.LastError = 2, "previous failure"
	b.Qualifier = "3" // an Event invoking published version 3
	enqueue(t, s, a, b)
	wantLen(t, s, 2)

	got := claim(t, s, base.Add(time.Second), 10)
	if len(got) != 2 {
		t.Fatalf("Claim: %v, want both events", ids(got))
	}
	byID := map[string]*store.Event{got[0].RequestID: got[0], got[1].RequestID: got[1]}
	checkEvent(t, byID["req-a"], a, 1)
	checkEvent(t, byID["req-b"], b, 3)
	wantLen(t, s, 2) // claimed events stay queued until Complete
}

func testQueueEnqueueEmpty(t *testing.T, s store.Store) {
	must(t, s.Queue().Enqueue(ctx(t), nil), "Enqueue nil")
	wantLen(t, s, 0)
}

// testQueueDuplicate checks that a batch is one transaction: a duplicate
// request id fails it whole.
func testQueueDuplicate(t *testing.T, s store.Store) {
	enqueue(t, s, event("req-1", base))
	err := s.Queue().Enqueue(ctx(t), []*store.Event{event("req-2", base), event("req-1", base), event("req-3", base)})
	wantKind(t, err, errdefs.ErrAlreadyExists, "Enqueue with a duplicate")
	wantLen(t, s, 1)
	got := claim(t, s, base, 10)
	if !slices.Equal(ids(got), []string{"req-1"}) {
		t.Fatalf("after failed batch Claim got %v, want only req-1", ids(got))
	}
}

func testQueueNotBefore(t *testing.T, s store.Store) {
	later := event("req-later", base)
	later.NotBefore = base.Add(time.Minute)
	enqueue(t, s, later)
	if got := claim(t, s, base, 10); len(got) != 0 {
		t.Fatalf("Claim before NotBefore: %v, want none", ids(got))
	}
	if got := claim(t, s, base.Add(time.Minute-time.Nanosecond), 10); len(got) != 0 {
		t.Fatalf("Claim 1ns before NotBefore: %v, want none", ids(got))
	}
	got := claim(t, s, base.Add(time.Minute), 10)
	if !slices.Equal(ids(got), []string{"req-later"}) {
		t.Fatalf("Claim at NotBefore: %v, want req-later", ids(got))
	}
	checkEvent(t, got[0], later, 1)
}

func testQueueLease(t *testing.T, s store.Store) {
	enqueue(t, s, event("req-l", base))
	first := claim(t, s, base, 10)
	if len(first) != 1 {
		t.Fatalf("first Claim: %v", ids(first))
	}
	if got := claim(t, s, base.Add(lease/2), 10); len(got) != 0 {
		t.Fatalf("Claim while leased: %v, want none", ids(got))
	}
	if got := claim(t, s, base.Add(lease-time.Nanosecond), 10); len(got) != 0 {
		t.Fatalf("Claim 1ns before the lease expires: %v, want none", ids(got))
	}
	// At-least-once: an expired lease makes the event claimable again.
	again := claim(t, s, base.Add(lease+time.Millisecond), 10)
	if !slices.Equal(ids(again), []string{"req-l"}) {
		t.Fatalf("Claim after the lease expired: %v, want req-l", ids(again))
	}
	checkEvent(t, again[0], event("req-l", base), 2)
}

func testQueueMax(t *testing.T, s store.Store) {
	for i := range 5 {
		enqueue(t, s, event(fmt.Sprintf("req-%d", i), base.Add(time.Duration(i))))
	}
	seen := map[string]bool{}
	for _, want := range []int{2, 2, 1, 0} {
		got := claim(t, s, base, 2)
		if len(got) != want {
			t.Fatalf("Claim(max=2): %d events, want %d", len(got), want)
		}
		for _, e := range got {
			if seen[e.RequestID] {
				t.Fatalf("%s claimed twice while leased", e.RequestID)
			}
			seen[e.RequestID] = true
		}
	}
	wantLen(t, s, 5)
}

func testQueueOrder(t *testing.T, s store.Store) {
	// Enqueued out of order in separate calls: Claim returns oldest first.
	for _, i := range []int{4, 1, 3, 0, 2} {
		enqueue(t, s, event(fmt.Sprintf("req-%d", i), base.Add(time.Duration(i)*time.Millisecond)))
	}
	got := claim(t, s, base.Add(time.Second), 3)
	if want := []string{"req-0", "req-1", "req-2"}; !slices.Equal(ids(got), want) {
		t.Fatalf("Claim order: %v, want %v", ids(got), want)
	}
	got = claim(t, s, base.Add(time.Second), 3)
	if want := []string{"req-3", "req-4"}; !slices.Equal(ids(got), want) {
		t.Fatalf("second Claim order: %v, want %v", ids(got), want)
	}
}

func testQueueComplete(t *testing.T, s store.Store) {
	enqueue(t, s, event("req-1", base), event("req-2", base))
	claim(t, s, base, 10)
	must(t, s.Queue().Complete(ctx(t), "req-1"), "Complete")
	wantLen(t, s, 1)
	must(t, s.Queue().Complete(ctx(t), "req-1"), "second Complete")
	must(t, s.Queue().Complete(ctx(t), "req-unknown"), "Complete unknown")
	wantLen(t, s, 1)
	// A completed event is never claimed again, even after its lease.
	got := claim(t, s, base.Add(2*lease), 10)
	if !slices.Equal(ids(got), []string{"req-2"}) {
		t.Fatalf("Claim after Complete: %v, want req-2", ids(got))
	}
}

func testQueueRetry(t *testing.T, s store.Store) {
	orig := event("req-r", base)
	enqueue(t, s, orig)
	claim(t, s, base, 10)
	retryAt := base.Add(5 * time.Second) // before the lease would expire
	must(t, s.Queue().Retry(ctx(t), "req-r", retryAt, "Handled: boom"), "Retry")
	wantLen(t, s, 1)
	if got := claim(t, s, retryAt.Add(-time.Nanosecond), 10); len(got) != 0 {
		t.Fatalf("Claim before the retry time: %v, want none", ids(got))
	}
	// Retry released the lease: claimable at notBefore though the first
	// lease would still be held.
	got := claim(t, s, retryAt, 10)
	if len(got) != 1 {
		t.Fatalf("Claim at the retry time: %v, want req-r", ids(got))
	}
	want := *orig
	want.NotBefore, want.LastError = retryAt, "Handled: boom"
	checkEvent(t, got[0], &want, 2)
}

func testQueueRetryMissing(t *testing.T, s store.Store) {
	err := s.Queue().Retry(ctx(t), "req-missing", base, "x")
	wantKind(t, err, errdefs.ErrNotFound, "Retry of an unknown event")
}

// testQueueConcurrentClaimers checks that claimers racing on one queue
// never get the same event while it is leased: every event is claimed once.
func testQueueConcurrentClaimers(t *testing.T, s store.Store) {
	const n, claimers = 300, 6
	var evs []*store.Event
	for i := range n {
		evs = append(evs, event(fmt.Sprintf("req-%03d", i), base.Add(time.Duration(i))))
	}
	enqueue(t, s, evs...)

	var (
		mu     sync.Mutex
		counts = map[string]int{}
		total  int
		wg     sync.WaitGroup
		errs   = make(chan error, claimers)
	)
	for range claimers {
		wg.Go(func() {
			for {
				got, err := s.Queue().Claim(ctx(t), base, time.Hour, 7)
				if err != nil {
					errs <- err
					return
				}
				if len(got) == 0 {
					return
				}
				mu.Lock()
				for _, e := range got {
					counts[e.RequestID]++
					total++
				}
				// A store that re-hands leased events would keep the
				// claimers busy forever; stop once that is certain.
				runaway := total > 2*n
				mu.Unlock()
				if runaway {
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent Claim: %v", err)
	}
	if len(counts) != n {
		t.Fatalf("claimed %d distinct events, want %d", len(counts), n)
	}
	for id, c := range counts {
		if c != 1 {
			t.Fatalf("%s claimed %d times under one lease", id, c)
		}
	}
}

func testQueueCopies(t *testing.T, s store.Store) {
	in := event("req-c", base)
	want := event("req-c", base)
	enqueue(t, s, in)
	in.Payload[0] = 'X'
	in.Function = "mutated"
	got := claim(t, s, base, 1)
	checkEvent(t, got[0], want, 1)
	got[0].Payload[0] = 'Y'
	again := claim(t, s, base.Add(2*lease), 1)
	checkEvent(t, again[0], want, 2)
}

func testQueueCancelled(t *testing.T, s store.Store) {
	err := s.Queue().Enqueue(cancelled(t), []*store.Event{event("req-x", base)})
	wantKind(t, err, context.Canceled, "Enqueue with a cancelled context")
	wantLen(t, s, 0)
	enqueue(t, s, event("req-y", base))
	_, err = s.Queue().Claim(cancelled(t), base, lease, 10)
	wantKind(t, err, context.Canceled, "Claim with a cancelled context")
	// The cancelled Claim leased nothing.
	if got := claim(t, s, base, 10); len(got) != 1 {
		t.Fatalf("Claim after a cancelled Claim: %v, want req-y", ids(got))
	}
}

func testQueueReleaseLeases(t *testing.T, s store.Store) {
	enqueue(t, s, event("req-r1", base), event("req-r2", base))
	if got := claim(t, s, base, 1); len(got) != 1 {
		t.Fatalf("first Claim: %v", ids(got))
	}
	n, err := s.Queue().ReleaseLeases(context.Background(), base)
	if err != nil || n != 1 {
		t.Fatalf("ReleaseLeases = %d, %v; want 1 released", n, err)
	}
	// Both are due now: the released one and the never-claimed one.
	if got := claim(t, s, base, 10); len(got) != 2 {
		t.Fatalf("Claim after ReleaseLeases: %v, want both events", ids(got))
	}
}
