package firecracker

import "sync"

// syncOnceErr runs a function once and hands its error to every caller,
// including those that arrived while it ran.
type syncOnceErr struct {
	once sync.Once
	err  error
}

func (o *syncOnceErr) do(fn func() error) error {
	o.once.Do(func() { o.err = fn() })
	return o.err
}
