package hostproc

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
)

func TestTable(t *testing.T) {
	var tab Table[*int]
	if _, ok := tab.Get("a"); ok {
		t.Fatal("empty table has a")
	}
	a, b := new(int), new(int)
	if err := tab.Add("a", a); err != nil {
		t.Fatal(err)
	}
	if err := tab.Add("a", b); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Add of a = %v, want ErrAlreadyExists", err)
	}
	if got, ok := tab.Get("a"); !ok || got != a {
		t.Errorf("Get(a) = %p, %v; want the first instance", got, ok)
	}
	tab.Remove("a")
	tab.Remove("a")
	if _, ok := tab.Get("a"); ok {
		t.Errorf("a still registered after Remove")
	}
	if err := tab.Add("a", b); err != nil {
		t.Errorf("Add after Remove: %v", err)
	}
}

func TestTableClose(t *testing.T) {
	var tab Table[string]
	for i := range 5 {
		id := fmt.Sprint(i)
		if err := tab.Add(id, id); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	stopped := map[string]int{}
	// Every stop waits for all the others: Close must run them
	// concurrently or this never returns.
	var all sync.WaitGroup
	all.Add(5)
	stop := func(id string) error {
		mu.Lock()
		stopped[id]++
		n := stopped[id]
		mu.Unlock()
		if n == 1 {
			all.Done()
			all.Wait()
		}
		tab.Remove(id)
		if id == "3" {
			return errors.New("three failed")
		}
		return nil
	}
	first, err := tab.Close(stop)
	if !first || err == nil || err.Error() != "three failed" {
		t.Errorf("Close = %v, %v; want first and three's error", first, err)
	}
	if len(stopped) != 5 {
		t.Errorf("stopped %v, want all five", stopped)
	}
	if err := tab.Add("new", "new"); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Add after Close = %v, want ErrUnavailable", err)
	}
	first, err = tab.Close(stop)
	if first || err != nil {
		t.Errorf("second Close = %v, %v; want not first, no error (nothing left)", first, err)
	}
}
