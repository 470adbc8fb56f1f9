package agent

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestCapBufferKeepsEverythingUnderTheLimit(t *testing.T) {
	b := newCapBuffer(16 << 10)
	var want bytes.Buffer
	for i := 0; i < 100; i++ {
		line := fmt.Sprintf("line %d\n", i)
		b.Write([]byte(line))
		want.WriteString(line)
	}
	if got := b.Bytes(); !bytes.Equal(got, want.Bytes()) {
		t.Errorf("kept %q, want %q", got, want.Bytes())
	}
	if b.Total() != int64(want.Len()) || b.Dropped() != 0 {
		t.Errorf("total %d dropped %d", b.Total(), b.Dropped())
	}
}

// Against a reference model, with random write sizes: the buffer keeps
// exactly the first headCap and the last tailCap bytes and counts the rest.
func TestCapBufferHeadAndTail(t *testing.T) {
	for _, limit := range []int{1, 100, minTail, minTail + 1, 3 * minTail, 64 << 10} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(limit), 7))
			b := newCapBuffer(limit)
			var all []byte
			for i := 0; i < 400; i++ {
				p := make([]byte, rng.IntN(3*limit/2+2))
				for j := range p {
					p[j] = byte('a' + (i+j)%26)
				}
				b.Write(p)
				all = append(all, p...)
			}
			if b.Total() != int64(len(all)) {
				t.Fatalf("Total = %d, want %d", b.Total(), len(all))
			}
			head := all[:min(b.headCap, len(all))]
			tail := all[max(len(head), len(all)-b.tailCap):]
			dropped := len(all) - len(head) - len(tail)
			if b.Dropped() != int64(dropped) {
				t.Fatalf("Dropped = %d, want %d", b.Dropped(), dropped)
			}
			marker := ""
			if dropped > 0 {
				marker = fmt.Sprintf("\n[%d bytes of output dropped: log limit reached]\n", dropped)
				if len(head) == 0 {
					marker = marker[1:]
				}
			}
			want := string(head) + marker + string(tail)
			if got := string(b.Bytes()); got != want {
				t.Fatalf("kept %d bytes, want %d", len(got), len(want))
			}
			if len(head)+len(tail) > limit {
				t.Fatalf("kept %d bytes over the %d limit", len(head)+len(tail), limit)
			}
		})
	}
}

func TestCapBufferTailIsAtLeast4KiB(t *testing.T) {
	b := newCapBuffer(8 << 10)
	b.Write(bytes.Repeat([]byte("h"), 8<<10))
	b.Write(bytes.Repeat([]byte("t"), 10<<10))
	if got := string(b.Bytes()); !strings.HasSuffix(got, strings.Repeat("t", minTail)) {
		t.Errorf("last 4 KiB not kept: ...%q", got[len(got)-40:])
	}
}

// Output written before setSink lands in the old sink even when the
// drainer has not run yet; later output goes to the new one.
func TestOutputSetSinkFlushesPendingBytes(t *testing.T) {
	first := newCapBuffer(1 << 20)
	o, err := newOutput(first)
	if err != nil {
		t.Fatal(err)
	}
	defer o.close()
	for i := 0; i < 200; i++ {
		want := fmt.Sprintf("chunk %d\n", i)
		if _, err := o.writer().Write([]byte(want)); err != nil {
			t.Fatal(err)
		}
		next := newCapBuffer(1 << 20)
		o.setSink(next)
		o.mu.Lock()
		got := string(first.Bytes())
		o.mu.Unlock()
		if got != want {
			t.Fatalf("sink %d holds %q, want %q", i, got, want)
		}
		first = next
	}
}
