#!/bin/bash
# In the shape of RunPod's template start scripts: hooks around the services, then sleep infinity.
set -e
execute_script() {
  if [[ -f $1 ]]; then
    echo "$2"
    bash "$1"
  fi
}
echo "Pod Started"
execute_script /pre_start.sh "Running pre-start script..."
(exec -a sshd-standin sleep infinity) &
(exec -a jupyter-standin sleep infinity) &
mkdir -p /workspace/ComfyUI/output
python /comfyui/main.py --listen 127.0.0.1 --port "${COMFY_PORT:-8188}" --output-directory /workspace/ComfyUI/output &
execute_script /post_start.sh "Running post-start script..."
echo "Start script(s) finished, pod is ready to use."
sleep infinity
