mod kind_params;
