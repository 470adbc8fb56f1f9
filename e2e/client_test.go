package e2e

import "github.com/invokex/invokex/internal/client"

type clientRuntime = client.Runtime

func newClient(s *server) *client.Client { return client.New(s.endpoint) }
