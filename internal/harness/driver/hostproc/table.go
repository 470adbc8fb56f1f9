package hostproc

import (
	"errors"
	"fmt"
	"sync"

	"github.com/invokex/invokex/internal/errdefs"
)

// Table is a driver's live instances by ID, and whether the driver is
// closed. It is what lets Close know that nothing will start (or fork)
// after it: every Start registers its instance with Add before creating
// anything, and Add fails once Close has begun, so the instances Close
// stops are all there will ever be.
//
// The zero Table is empty and open. A Table is safe for concurrent use.
type Table[T any] struct {
	mu     sync.Mutex
	closed bool
	m      map[string]T
}

// Add registers inst as id. It fails with errdefs.ErrUnavailable once
// Close has been called, and with errdefs.ErrAlreadyExists while id is
// registered.
func (t *Table[T]) Add(id string, inst T) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return fmt.Errorf("driver closed: %w", errdefs.ErrUnavailable)
	}
	if _, ok := t.m[id]; ok {
		return errdefs.ErrAlreadyExists
	}
	if t.m == nil {
		t.m = map[string]T{}
	}
	t.m[id] = inst
	return nil
}

// Get returns the instance registered as id.
func (t *Table[T]) Get(id string) (T, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	inst, ok := t.m[id]
	return inst, ok
}

// Remove unregisters id, once its instance is gone. Removing an id that
// is not registered does nothing.
func (t *Table[T]) Remove(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, id)
}

// Close marks the table closed, so every later Add fails, and calls stop
// for every registered instance, concurrently, returning their errors
// joined. stop must be safe to call more than once per instance (a second
// Close calls it again) and should Remove the instance. first reports
// whether this was the first Close: the one that may release what the
// instances needed (e.g. a Forker), since none is left and none can come.
func (t *Table[T]) Close(stop func(T) error) (first bool, err error) {
	t.mu.Lock()
	first = !t.closed
	t.closed = true
	insts := make([]T, 0, len(t.m))
	for _, inst := range t.m {
		insts = append(insts, inst)
	}
	t.mu.Unlock()
	errs := make([]error, len(insts))
	var wg sync.WaitGroup
	for i, inst := range insts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = stop(inst)
		}()
	}
	wg.Wait()
	return first, errors.Join(errs...)
}
